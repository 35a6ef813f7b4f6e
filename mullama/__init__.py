"""mullama"""
