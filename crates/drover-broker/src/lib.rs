//! The embedded MQTT 5 broker.
