//! densepred-evaluation (see ../shared/DESIGN.md).
