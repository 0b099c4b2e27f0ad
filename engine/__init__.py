"""Persona's engine: workspace, stages, backends. Never imports textual."""
