//! `connectord simulate` (interface; being written).
