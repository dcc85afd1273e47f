"""Operating the suite on one machine: bring it up, run its processes (`make up`)."""
