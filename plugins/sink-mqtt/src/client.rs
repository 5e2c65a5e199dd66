//! One connection per call: connect (CONNACK), publish every message of the batch at QoS 1,
//! wait for every PUBACK, disconnect. Decision: no connection is kept between calls (an
//! instance's runtime only runs during a call, so a kept connection would miss its
//! keep-alives); a batch is one connection, and the hub's batching (`max_batch` events)
//! amortises it.

use std::sync::Arc;
use std::time::Duration;

use connectord_plugin_sdk::sink::DeliverResponse;
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, Outgoing,
    Packet, QoS, TlsConfiguration, Transport,
};
use tokio::time::Instant;

use crate::target::{Broker, Message};

/// Largest message sent (a registration of an endpoint with many resources is a few KiB).
const MAX_OUTGOING_PACKET: usize = 4 * 1024 * 1024;
/// Largest packet taken from the broker (it sends only acknowledgements).
const MAX_INCOMING_PACKET: usize = 64 * 1024;
/// Keep-alive asked of the broker: calls are shorter than this in practice.
const KEEP_ALIVE: Duration = Duration::from_secs(60);
/// How long the goodbye (DISCONNECT) may take once the batch was acknowledged.
const DISCONNECT_WAIT: Duration = Duration::from_secs(1);

/// What a call could not do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The broker refused for good (credentials, client id): retrying will not help.
    Refused(String),
    /// Connecting, TLS, the exchange or the timeout failed: may work later.
    Transport(String),
}

impl Failure {
    pub fn reason(&self) -> &str {
        match self {
            Failure::Refused(r) | Failure::Transport(r) => r,
        }
    }
}

impl From<Failure> for DeliverResponse {
    fn from(f: Failure) -> Self {
        match f {
            Failure::Refused(reason) => DeliverResponse::Refused { reason },
            Failure::Transport(reason) => DeliverResponse::Retry { reason },
        }
    }
}

/// The MQTT client of one instance: its TLS configuration and its timeout.
pub struct Client {
    pub timeout: Duration,
    pub tls: Arc<rustls::ClientConfig>,
}

impl Client {
    fn options(&self, broker: &Broker, queued: usize) -> MqttOptions {
        // A client id of its own for every connection: two of them at once (two lanes
        // delivering to one broker) must not take each other's session over.
        let id = format!("connectord-{:016x}", rand::random::<u64>());
        let mut o = MqttOptions::new(id, broker.host.clone(), broker.port);
        o.set_keep_alive(KEEP_ALIVE)
            .set_clean_session(true)
            .set_max_packet_size(MAX_INCOMING_PACKET, MAX_OUTGOING_PACKET)
            .set_request_channel_capacity(queued.max(1) + 1);
        if let Some(user) = &broker.user {
            o.set_credentials(user.clone(), broker.password.clone().unwrap_or_default());
        }
        if broker.tls {
            o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                Arc::clone(&self.tls),
            )));
        }
        o
    }

    /// Connects, publishes `messages` in order at QoS 1 and waits until the broker has
    /// acknowledged every one (PUBACK), within the timeout. `Ok` only then.
    pub async fn publish(&self, broker: &Broker, messages: &[Message]) -> Result<(), Failure> {
        let deadline = Instant::now() + self.timeout;
        let (client, mut eventloop) =
            AsyncClient::new(self.options(broker, messages.len()), messages.len() + 1);
        // rumqttc's own bound on connecting, a second past the call's: the call's deadline
        // decides, with the reason it gives.
        let mut network = eventloop.network_options();
        network.set_connection_timeout(self.timeout.as_secs().saturating_add(1));
        eventloop.set_network_options(network);
        for m in messages {
            client
                .try_publish(
                    m.topic.clone(),
                    QoS::AtLeastOnce,
                    false,
                    m.payload.clone().into_bytes(),
                )
                .map_err(|e| Failure::Transport(format!("cannot queue a message: {e}")))?;
        }
        let mut acked = 0usize;
        let mut connected = false;
        while acked < messages.len() || !connected {
            let event = tokio::time::timeout_at(deadline, eventloop.poll()).await;
            match event {
                Err(_) => {
                    return Err(Failure::Transport(if connected {
                        format!(
                            "{} of {} messages not acknowledged (PUBACK) by {} within {}s",
                            messages.len() - acked,
                            messages.len(),
                            broker.address(),
                            self.timeout.as_secs()
                        )
                    } else {
                        format!(
                            "no answer (CONNACK) from MQTT broker {} within {}s",
                            broker.address(),
                            self.timeout.as_secs()
                        )
                    }));
                }
                Ok(Err(e)) => return Err(failure(broker, e)),
                Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => connected = true,
                Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
                Ok(Ok(_)) => {}
            }
        }
        goodbye(&client, &mut eventloop).await;
        Ok(())
    }
}

/// Sends DISCONNECT and waits (briefly) until it is written; the result does not matter.
async fn goodbye(client: &AsyncClient, eventloop: &mut EventLoop) {
    if client.try_disconnect().is_err() {
        return;
    }
    let _ = tokio::time::timeout(DISCONNECT_WAIT, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
}

/// The reason of a failed connection, and whether retrying may help.
fn failure(broker: &Broker, e: ConnectionError) -> Failure {
    let at = broker.address();
    match e {
        ConnectionError::ConnectionRefused(code) => {
            let why = match code {
                ConnectReturnCode::BadUserNamePassword => "bad user name or password",
                ConnectReturnCode::NotAuthorized => "not authorised",
                ConnectReturnCode::BadClientId => "client identifier refused",
                ConnectReturnCode::RefusedProtocolVersion => "MQTT 3.1.1 not accepted",
                ConnectReturnCode::ServiceUnavailable => {
                    return Failure::Transport(format!(
                        "MQTT broker {at} refused the connection: service unavailable"
                    ));
                }
                ConnectReturnCode::Success => "success (?)",
            };
            Failure::Refused(format!("MQTT broker {at} refused the connection: {why}"))
        }
        ConnectionError::Io(io) => {
            Failure::Transport(format!("cannot connect to MQTT broker {at}: {io}"))
        }
        ConnectionError::Tls(tls) => {
            Failure::Transport(format!("TLS with MQTT broker {at} failed: {tls}"))
        }
        ConnectionError::NetworkTimeout => {
            Failure::Transport(format!("cannot connect to MQTT broker {at}: timed out"))
        }
        other => Failure::Transport(format!("MQTT broker {at}: {other}")),
    }
}
