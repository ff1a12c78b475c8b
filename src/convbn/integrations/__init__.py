"""Optional integrations (need their framework installed):

- :mod:`convbn.integrations.lightning`: ``ConvBNTune``, a Lightning callback;
- :mod:`convbn.integrations.mmengine`: ``ConvBNTuneHook``, an MMEngine hook.
"""
