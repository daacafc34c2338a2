//! densepred-datasets (see ../shared/DESIGN.md).
