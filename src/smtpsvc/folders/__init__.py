"""The mailroot folders an operator and applications touch directly: Pickup and Badmail."""
