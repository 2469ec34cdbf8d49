"""guest_sdk"""
