"""Layer 3: peer transport, SWIM membership, gossip and anti-entropy, routing, discovery."""
