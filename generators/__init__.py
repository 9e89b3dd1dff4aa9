from cl_proxyfda.generators import diffusers_backend  # noqa: F401
from cl_proxyfda.generators import world_backend  # noqa: F401
