"""Training engine: the task registry, Lightning wrappers, trainer factory, run folder."""
