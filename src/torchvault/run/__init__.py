"""The run folder: its store, the lock-free readers, retention and ``CheckpointManager``.

``_store`` is the folder over a ``Storage`` (content-addressed objects, sealed manifests,
pointer files); ``_readers`` the functions shared by the manager and the command line;
``retention`` the policy values (public as ``torchvault.retention``); ``_manager`` composes
them with ``_rng`` into ``CheckpointManager``. Nothing is imported here, so that the layers
below (the legacy scan reads ``_store``) can import one module without the manager.
"""
