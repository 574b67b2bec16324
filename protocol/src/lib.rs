pub mod journal;
pub mod nbd;
