"""Recipe schemas of the tasks (the configuration layer): one module per task.

:mod:`defectscope.config` holds what every recipe shares (``BaseRecipe``, ``TrainConfig``, ``EvalConfig``,
loading, overrides, validation); ``recipes/<task>.py`` holds the task's own blocks (``*Data``,
``*ModelConfig``, ``*TrainConfig``, ``*Recipe``). A task's hooks (:mod:`defectscope.engine`) name their
schema as ``TaskHooks.recipe``; nothing here reads data, builds a model or trains.

Layers: ``config``, ``data``, ``models``, ``evaluation`` < ``recipes`` < ``engine``.
"""
