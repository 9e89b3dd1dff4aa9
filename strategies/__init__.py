"""Avalanche plugins, one method a module; importing this package registers them all."""
from cl_proxyfda.strategies import awc, coop, ewc, gift, infusing, l2sp, ldifs, lwf, naive, proxy_fda, wiseft, zscl  # noqa: F401
