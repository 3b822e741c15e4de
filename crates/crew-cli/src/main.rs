//! crew-cli
fn main(){}
