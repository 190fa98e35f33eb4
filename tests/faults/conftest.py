"""Fault tests run real processes; they share the `processes` xdist group with the crash tests
so two clusters never fight over two cores."""
