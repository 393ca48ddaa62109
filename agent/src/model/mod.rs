//! The types every stage shares: what the assembler makes of the probes' events
//! ([`Observation`] and its parts), requests, and the readings of the resources beside them.
//! Defining them here, below every stage, keeps the stages' imports one way.

mod calls;
pub mod clock;
mod ending;
mod observation;
mod origin;
mod profile;
mod request;
mod resources;
mod server;
mod snapshot;
mod step;

pub use calls::*;
pub use ending::*;
pub use observation::*;
pub use origin::*;
pub use profile::*;
pub use request::*;
pub use resources::*;
pub use server::*;
pub use snapshot::*;
pub use step::*;
