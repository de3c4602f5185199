"""A stand-in for the third-party ``dpypelinetools`` package of the original's example 2,
which is not installable: its task functions at the same dotted paths, as a user's own
package would put them."""
