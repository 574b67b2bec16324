pub mod generation;
pub mod journal;
pub mod nbd;
pub mod repl;
pub mod session;
