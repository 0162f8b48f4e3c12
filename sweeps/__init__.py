"""Study files: in a checkout at the top (sweeps/), installed as ``grafccsr.studies``."""
