"""zhilian"""
