"""Experiment configs: ``get_config(arg)`` per job, the only place with an
experiment's numbers.  Use them as ``--config=glue_jax/configs/<name>.py:<args>``
(``runlocal`` is the smoke-run switch of every config)."""
