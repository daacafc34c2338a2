//! densepred-models (see ../shared/DESIGN.md).
