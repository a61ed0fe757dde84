//! Host agent: registration, inventory, disk reading, QUIC shipping, tracker
