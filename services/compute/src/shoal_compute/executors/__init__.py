"""Executors: one small plugin per engine behind the :class:`Executor` protocol."""
