mod buf;
pub use buf::{align_up, AlignedBuf, SharedBuf, DIRECT_ALIGN};
