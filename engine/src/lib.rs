//! densepred-engine (see ../shared/DESIGN.md).
