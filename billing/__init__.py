"""Billing: plans, subscriptions, seat ledger, Stripe, usage metering."""
