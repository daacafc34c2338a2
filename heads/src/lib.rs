//! densepred-heads (see ../shared/DESIGN.md).
