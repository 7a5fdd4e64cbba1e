//! All of the crate's integration tests, one binary (one link). The guest is a second smoltcp
//! interface wired to the stack through packet queues: a real TCP client, no mock of TCP.

mod guest;
mod network;
mod stack;
