"""The parts that the scripts and the method files on top are made of, one file per idea."""
