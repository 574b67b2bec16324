pub mod nbd;
pub mod journal;
