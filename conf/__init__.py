"""Hydra config tree: in a checkout at the top (conf/), installed as ``grafccsr.conf``."""
