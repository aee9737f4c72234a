//! mesh-control
