from cl_proxyfda.benchmarks import image_folder, mtil  # noqa: F401
