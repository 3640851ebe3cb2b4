"""Modules exported from the notebooks in nbs/ by notebook2script.py: nb_00, nb_05, nb_05a, nb_05b, nb_06, nb_07, nb_07b."""
