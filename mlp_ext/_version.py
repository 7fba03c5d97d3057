"""The package's version: the one place it is written. setup.py reads this file
(without importing the package); a built wheel's version is this plus the local
label of the torch it was built for (e.g. 0.2.0+torch2.13cpu, see _build_check.py)."""
__version__ = "0.2.0"
