from cl_proxyfda.generators import diffusers_backend  # noqa: F401
