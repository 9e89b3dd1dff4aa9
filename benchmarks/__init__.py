from cl_proxyfda.benchmarks import image_folder, mtil  # noqa: F401
from cl_proxyfda.benchmarks import demo_stream  # noqa: F401
from cl_proxyfda.benchmarks import xtail  # noqa: F401
