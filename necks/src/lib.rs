//! densepred-necks (see ../shared/DESIGN.md).
