"""Tools beside the core (the core never imports them): ``bench``."""
