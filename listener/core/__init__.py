"""Internal: what every stage stands on (events, errors, retry policy, logs, metrics).

Nothing here imports a stage. Plugin authors import from :mod:`listener`, never from here.
"""
