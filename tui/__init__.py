"""Persona's Textual application. Reads files, starts stages through the engine, renders events.

Nothing in ``engine/`` imports this package.
"""
