//! Entry points for the fuzz targets (not a stable API).
