//! The daemon's certificate authority for `POST /api/cert` (interface; being written).
