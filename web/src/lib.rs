//! The HTTP side of wattd's exposition, shared by the agent and the ledger: the `/metrics`
//! endpoint on hyper ([`server`]), the web configuration that puts it behind TLS, client
//! certificates and basic auth in the Prometheus exporter toolkit's format ([`config`],
//! [`auth`]), the text format's writer ([`exposition`]), and the client that scrapes it
//! ([`client`], for `wattd top`).

#![forbid(unsafe_code)]

pub mod auth;
pub mod client;
pub mod config;
pub mod exposition;
pub mod server;
pub mod tls;

pub use client::{ClientOptions, ScrapeClient, ScrapeError};
pub use config::{ClientAuth, WebConfig, WebConfigError};
pub use hyper::StatusCode;
pub use server::{EndpointStats, HttpLimits, MetricsEndpoint};
