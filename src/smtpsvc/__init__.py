"""smtpsvc: a durable SMTP relay modelled on the IIS SMTP Service (Pickup, Queue, Drop, Badmail)."""

__version__ = "0.1.0"
