# Chart for BENCHMARKS.md; scripts/bench.sh calls it with datafile, outfile and subtitle set.
# Each panel is one index of the data file: rows `x "label" median min max`.
set terminal pngcairo size 1500,950 font "DejaVu Sans,11"
set output outfile
set multiplot layout 2,3 title "skrelay benchmarks: medians, bars show min-max (".subtitle.")" font ",14"
set style fill solid 0.7 border -1
set boxwidth 0.65
set grid ytics
set xtics rotate by -35 nomirror
set ytics nomirror
set key off
set yrange [0:*]
set offsets 0.5, 0.5, 0, 0

set title "Bulk throughput, Gbit/s (higher is better)"
plot datafile index 0 using 1:3:xtic(2) with boxes lc rgb "#3b75af", \
     '' index 0 using 1:3:4:5 with yerrorbars lc rgb "black" pt -1 lw 1.5, \
     '' index 0 using 1:3:(sprintf("%.1f", $3)) with labels offset 0,0.8 font ",9"
set yrange [*:*]
set title "Extra CPU-seconds per GiB over direct, whole machine (lower is better)"
plot datafile index 1 using 1:3:xtic(2) with boxes lc rgb "#e1812c", \
     '' index 1 using 1:3:4:5 with yerrorbars lc rgb "black" pt -1 lw 1.5, \
     '' index 1 using 1:3:(sprintf("%.2f", $3)) with labels offset 0,0.8 font ",9"
set yrange [0:*]
set title "Ping-pong p50, all on CPU 0, microseconds (lower is better)"
plot datafile index 2 using 1:3:xtic(2) with boxes lc rgb "#3a923a", \
     '' index 2 using 1:3:4:5 with yerrorbars lc rgb "black" pt -1 lw 1.5, \
     '' index 2 using 1:3:(sprintf("%.1f", $3)) with labels offset 0,0.8 font ",9"
set title "Ping-pong p99, unpinned, microseconds (lower is better)"
plot datafile index 3 using 1:3:xtic(2) with boxes lc rgb "#c03d3e", \
     '' index 3 using 1:3:4:5 with yerrorbars lc rgb "black" pt -1 lw 1.5, \
     '' index 3 using 1:3:(sprintf("%.1f", $3)) with labels offset 0,0.8 font ",9"
set title "Connections per second, direct and through proxies (higher is better)"
plot datafile index 4 using 1:3:xtic(2) with boxes lc rgb "#9372b2", \
     '' index 4 using 1:3:4:5 with yerrorbars lc rgb "black" pt -1 lw 1.5, \
     '' index 4 using 1:3:(sprintf("%.0f", $3)) with labels offset 0,0.8 font ",9"
set title "Process RSS per idle pair, bytes (lower is better)"
plot datafile index 5 using 1:3:xtic(2) with boxes lc rgb "#845b53", \
     '' index 5 using 1:3:4:5 with yerrorbars lc rgb "black" pt -1 lw 1.5, \
     '' index 5 using 1:3:(sprintf("%.0f", $3)) with labels offset 0,0.8 font ",9"
unset multiplot
