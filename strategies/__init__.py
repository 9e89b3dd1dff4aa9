"""Avalanche plugins, one method a module; importing this package registers them all."""
from cl_proxyfda.strategies import ewc, l2sp, ldifs, lwf, naive, proxy_fda, wiseft  # noqa: F401
