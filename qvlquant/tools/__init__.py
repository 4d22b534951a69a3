"""Tools around the library: the decode benchmark and the scripts that built the shipped assets."""
